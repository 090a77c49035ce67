"""Memory-heavy rows for ``jobs/heavy.toml`` (issue #20): every row grows wide text columns."""

import pandas as pd


def widen(df: pd.DataFrame, columns: int = 8, width: int = 160) -> pd.DataFrame:
    """Add ``columns`` text columns of ``width`` characters per row, each built from the row's
    own id (so no two rows share a value): a transform whose memory grows with the chunk's rows
    many times faster than its input does."""
    df = df.copy()
    base = df["trip_id"].astype(str)
    for i in range(columns):
        df[f"note_{i}"] = (base + f"-{i}-").str.pad(width, side="right", fillchar="abcdefghij"[i])
    return df
