"""One module per fuzz target; see fuzz/target.py for what each defines."""
