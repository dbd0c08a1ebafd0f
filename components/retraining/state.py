"""Where `pairgan retrain` keeps what the next run, on any machine, continues from.

The state lives beside the DVC cache on the DVC remote, under `pairgan-state/` (a local folder
or an s3:// prefix):

    pairgan-state/current.json              the commit point: which run folder holds the state
    pairgan-state/runs/<id>/dvc.lock        the pipeline's record after that run
    pairgan-state/runs/<id>/files/...       the stage outputs DVC does not cache (reports)
    pairgan-state/runs/<id>/source.json     the source's file fingerprints (S3 ETags, size+mtime)
    pairgan-state/runs/<id>/retrain.json    that run's summary
    pairgan-state/champions/<model>/v<N>.pt the networks a promoted version was trained to

A run writes its folder, then replaces `current.json` in one write: a run that dies before
that leaves the previous state whole, and its half-written folder is never read.
"""

STATE_FOLDER = "pairgan-state"
CURRENT = "current.json"
