from ditquant.cli import main

main()
