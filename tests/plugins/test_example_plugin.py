"""The shipped contract suite on plugins/flowplug-example, as pip installed it."""

import pytest

from flowplug.testing.contract import TransportContract


class TestPipeContract(TransportContract):
    @pytest.fixture
    def transport(self, plugin_envs, use_env):
        use_env(plugin_envs.example)
        return "pipe"
