from cotmi_ds.cli import main

main()
