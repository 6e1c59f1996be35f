"""Sampling many images from a checkpoint: per-sample seeds and labels, resumable sharded storage, ADM output."""
