"""Jobs: a completed study becomes a job (admission), whose state only the store changes, and which
the runner's workers take through its stages (load -> infer -> encode -> enqueue for delivery)."""
