"""An example user function for the ``python`` step in ``config/example.toml``.

In: one chunk as a pandas DataFrame (pyarrow-backed dtypes) plus the step's ``params``
as keyword arguments. Out: a DataFrame (the same rows here, with one more column).
It runs inside worker processes, so it must depend only on its arguments.
"""

from __future__ import annotations

import pandas as pd


def flag_long_trips(df: pd.DataFrame, *, min_minutes: float, min_miles: float) -> pd.DataFrame:
    """Add ``long_trip``: true when a trip lasted ``min_minutes`` or covered ``min_miles``."""
    long_trip = (df["duration_min"] >= min_minutes) | (df["distance_mi"] >= min_miles)
    return df.assign(long_trip=long_trip)
