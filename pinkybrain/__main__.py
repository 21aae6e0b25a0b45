from pinkybrain.cli import main

main()
