from vlcap.cli import main

main()
