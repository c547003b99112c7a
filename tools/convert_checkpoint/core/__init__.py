"""Leaf types shared by the pipeline, the endpoints and the executor.

``plan`` holds what a conversion will write (``Plan``, ``OutputFile``, ``TensorJob``);
``canonical`` the canonical tensor description and its split kinds. Nothing here reads or
writes checkpoint data.
"""
