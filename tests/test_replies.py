from __future__ import annotations

import re

from postroom import replies
from postroom.replies import Reply


def test_each_named_reply_matches_its_code() -> None:
    named = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
    assert named, "no replies found"
    for name, reply in named.items():
        m = re.match(r"^S(\d{3})_[A-Z0-9_]+$", name)
        assert m, f"{name} is not named S<code>_<WHAT>"
        assert int(m.group(1)) == reply.code, f"{name} carries code {reply.code}"
        assert reply.status[0] == str(reply.code)[0], f"{name}: status {reply.status} contradicts {reply.code}"
        assert re.match(r"^[245]\.\d{1,3}\.\d{1,3}$", reply.status), name
        # A bare CR would end the SMTP reply line early in Postfix's log and in the client's dialog.
        assert "\r" not in reply.text, name
