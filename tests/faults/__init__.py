"""Helpers that inject faults into seqjax's I/O, run in subprocesses by the fault tests."""
