from imagebus.cli import main

main()
