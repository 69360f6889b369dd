"""Networks: backbones (ResNets, the tiny test convnet, timm models) and the MLP heads methods build from.
May import: kith.utils only."""
