"""Fine-tuning methods: one file per method, each attaching small modules to a base model."""
