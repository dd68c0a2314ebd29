"""PEFT methods: split a backbone's parameters into a frozen tree and an adapted tree, and run the model on both."""
