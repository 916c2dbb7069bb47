"""Ids without a system call each: unique, uuid-shaped, and never shared with a forked child."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import TestCase

from camgateway.base.ids import new_id


class IdTests(TestCase):
    def test_unique_and_shaped_like_uuid_hex(self) -> None:
        ids = [new_id() for _ in range(10_000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertTrue(all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids))

    def test_a_forked_child_draws_its_own_prefix(self) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report one id and leave at once
            try:
                os.write(write, new_id().encode())
            finally:
                os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        mine = new_id()
        self.assertEqual(len(child), 32)
        self.assertNotEqual(child[:16], mine[:16])
