"""Parsing of the ``dense_blocks`` node input ("0,1,28-29"); the syntax lives in salad_core.options."""
from ..salad_core.options import parse_block_list as _parse


def parse_block_list(text: str, num_blocks: int, input_name: str = "dense_blocks") -> set[int]:
    """Parse "0, 1, 28-29" into {0, 1, 28, 29}.  Negative numbers count from the end ("-1" = last).

    Raises ValueError naming the node input and the offending item.
    """
    return set(_parse(text, num_blocks, name=input_name))
