"""Run bookkeeping: identity, run store, teacher tape, studies, notebook execution, external sets, statistics, reports."""
