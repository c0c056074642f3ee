"""The method: loss terms, the cohort, its training step and its loop.

Still to untangle (issue 29): the cohort builds its default networks from tasks/models, the loop
keeps checkpoints, the run spec and the teacher tape itself (runs/) instead of taking callbacks."""
