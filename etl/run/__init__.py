"""The run machinery: the pipeline that wires the stages, sizing, the memory guard, state and stopping."""
