"""The login gate in front of the UI when `famsearch ui` was given a password (to serve it beyond this machine)."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import streamlit as st

from ui.password import HASH_ENV, password_matches

FREE_ATTEMPTS = 3  # wrong passwords before each further one closes the door for a while
MAX_COOL_DOWN_S = 300.0


@dataclass
class Throttle:
    """Wrong passwords across every session of the server process, so that opening a new session (reloading the
    page) does not reset the count; a right one does. From the FREE_ATTEMPTS-th wrong password on, each one
    closes the door for 2, 4, 8 ... seconds (at most MAX_COOL_DOWN_S), and attempts meanwhile go unchecked."""

    failures: int = 0
    open_at: float = 0.0  # time.monotonic() before which attempts are refused
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, stored: str, password: str, now: float) -> tuple[str, float]:
        """``password`` against the hash ``stored`` -> ("ok" | "wrong" | "wait", seconds until the next attempt
        is heard). Checked under the lock: concurrent sessions cannot slip guesses in before a failure counts."""
        with self.lock:
            if now < self.open_at:
                return "wait", self.open_at - now
            if password_matches(stored, password):
                self.failures, self.open_at = 0, 0.0
                return "ok", 0.0
            self.failures += 1
            if self.failures >= FREE_ATTEMPTS:
                self.open_at = now + min(2.0 ** (self.failures - FREE_ATTEMPTS + 1), MAX_COOL_DOWN_S)
            return "wrong", max(0.0, self.open_at - now)


# Per server process, not per session: this module is imported once and outlives the script's reruns.
THROTTLE = Throttle()
clock = time.monotonic  # the throttle's clock (a test holds it still)


def logged_in() -> bool:
    """True when no password is set or this session has given it; otherwise draws the login form and only it."""
    stored = os.environ.get(HASH_ENV)
    if not stored or st.session_state.get("logged_in"):
        return True
    st.title("famsearch")
    st.caption("This search is served beyond this machine: enter the password it was started with.")
    with st.form("login"):
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        verdict, wait_s = THROTTLE.attempt(stored, password, clock())
        if verdict == "ok":
            st.session_state.logged_in = True
            st.rerun()  # draw the search page now, without the form
        again = f" Try again in {math.ceil(wait_s)} s." if wait_s else ""
        st.error(("Wrong password." if verdict == "wrong" else "Too many wrong passwords.") + again)
    return False
