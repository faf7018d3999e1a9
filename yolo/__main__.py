from yolo.cli import program

raise SystemExit(program())
