"""The serving loop: sequences, block manager, scheduler, model runner."""
