"""Runtime: what every run needs whatever it trains. Processes (:mod:`.distributed`), seeds
(:mod:`.seeding`), the data order (:mod:`.sampling`), checkpoint files (:mod:`.checkpoints`),
precision (:mod:`.precision`), the optimiser step (:mod:`.optim`), logs (:mod:`.run_logger`), the
training loop (:mod:`.engine`) and the run folder's life (:mod:`.run_folder`)."""
