"""The daemon's control loops and their rules: the executor (journal intent → kernel), the
reconciler (kernel → journal after a crash), the pool of spares, the doctor, processes beside the
shell, who waits for an end, and admission (how much this daemon grants)."""
