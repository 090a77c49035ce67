"""The write stage: results in, a published output out (writer threads, then an atomic publish)."""
