"""The one legend of shape letters used in every annotation and docstring of chimera_jax.

    b  batch                     t  time (query positions)      s  source time (key positions)
    d  model width (d_model)     f  feed-forward width          v  vocabulary / value head dim
    h  query heads               g  key/value heads (groups)     k  key head dim
    n  state size (SSM d_state)  c  chunk length                w  window / conv width
    e  experts                   m  rows of a matmul (tokens)    l  layers

A comment such as ``# [b t h k]`` names the axes of the array on that line, in order.
"""
