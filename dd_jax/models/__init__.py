"""Networks (ConvNet family, AlexNet, VGG11, ResNet18, MLP, LeNet) behind a functional boundary."""

from dd_jax.models.registry import Network, Variables, get_network, network_names, param_count

__all__ = ['Network', 'Variables', 'get_network', 'network_names', 'param_count']
