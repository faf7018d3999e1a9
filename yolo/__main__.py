from yolo.cli import main

raise SystemExit(main())
