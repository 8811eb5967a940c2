from cpmgen.cli import main

main()
