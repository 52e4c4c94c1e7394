"""Parsing of the ``dense_blocks`` node input ("0,1,28-29")."""
from ..salad_core.weights import clip


def parse_block_list(text: str, num_blocks: int, input_name: str = "dense_blocks") -> set[int]:
    """Parse "0, 1, 28-29" into {0, 1, 28, 29}.  Negative numbers count from the end ("-1" = last).

    Raises ValueError naming the node input and the offending item.
    """
    out: set[int] = set()
    text = (text or "").strip()
    if not text:
        return out
    for raw in text.replace(";", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            if "-" in item[1:]:
                cut = item.index("-", 1)
                lo, hi = int(item[:cut]), int(item[cut + 1:])
                if lo < 0 or hi < 0:
                    raise ValueError
                if hi < lo:
                    raise ValueError
                rng = range(lo, hi + 1)
            else:
                n = int(item)
                rng = [n + num_blocks if n < 0 else n]
        except ValueError:
            raise ValueError(f"{input_name}: cannot read {clip(item, 60)} in {clip(text)}; expected block numbers "
                             f"and ranges such as '0,1,28-29'") from None
        bad = [b for b in (rng[0], rng[-1]) if not 0 <= b < num_blocks]   # checked before expanding
        if bad:
            raise ValueError(f"{input_name}: block {clip(bad[0], 40)} in {clip(text)} is out of range; this model "
                             f"has {num_blocks} blocks (0-{num_blocks - 1})")
        out.update(rng)
    return out
