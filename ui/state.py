"""Values the Streamlit script keeps between reruns of one session, recomputed only when their key changes."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import streamlit as st

T = TypeVar("T")


def memo(name: str, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` once per ``key`` in this session: the value is kept in ``st.session_state[name]`` and the
    key it was computed for in ``st.session_state[name + "_key"]``. A ``compute`` that raises leaves both as
    they were, so the next rerun tries again."""
    if st.session_state.get(name + "_key") != key:
        st.session_state[name] = compute()
        st.session_state[name + "_key"] = key
    return st.session_state[name]
