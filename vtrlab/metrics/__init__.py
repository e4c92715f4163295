"""Small pure metric functions: agreement between importance signals, fidelity of reduced answers."""
