from mprnet_cli.cli import main

main()
