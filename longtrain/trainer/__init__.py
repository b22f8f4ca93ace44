"""Training one stage: ``builder`` makes the parts and the starting point, ``Trainer``
(``trainer.py``) runs the loop, ``checkpointer`` saves and resumes, ``meter`` measures
throughput and progress, ``evaluator`` is the sharded forward that validation and the
gate evaluate with."""
