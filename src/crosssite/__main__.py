from crosssite.cli import main

main()
