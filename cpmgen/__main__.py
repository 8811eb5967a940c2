from cpmgen.entry import main

main()
