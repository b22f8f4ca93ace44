"""Data: document sources, preparation into token shards, memory-mapped reading, packing
into fixed-length samples, the stage mix, and a stateful loader.

Nothing is imported here, so the preparation's tokenizer processes start without torch.
"""
