"""A deliberately CPU-bound, pure-Python step: what the GIL holds to one core in threads."""

import pandas as pd


def fare_bucket_label(df: pd.DataFrame, rounds: int = 20) -> pd.DataFrame:
    """A per-row Python loop (like many real user functions): a label from fare and zone."""

    def label(fare: object, zone: object) -> str:
        h = 0
        for _ in range(rounds):
            h = (h * 31 + hash((str(fare), str(zone)))) & 0xFFFF
        return f"b{h % 97:02d}"

    df = df.copy()
    df["bucket"] = [label(f, z) for f, z in zip(df["fare_amount"], df["pickup_zone"])]
    return df
