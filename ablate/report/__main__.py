from ablate.report.document import main

main()
