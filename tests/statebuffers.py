"""State lists as the heat solver builds them, for the tests of the host time loops."""


def buffers(steps, kept, shape, dtype, rng):
    """``steps + 1`` states: the kept states (indices in ``kept``) in their own buffers, the
    others in two buffers in turn (so that ``states[n + 2] is states[n]``); every ghost
    random."""
    fresh = lambda: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    states, free = [fresh()], []
    for n in range(steps):
        states.append(free.pop() if free and n + 1 not in kept else fresh())
        if n not in kept:
            free.append(states[n])
    return states


def copied(states):
    """``states`` with each buffer copied once, the aliasing kept."""
    copies = {}
    return [copies.setdefault(id(a), a.copy()) for a in states]
