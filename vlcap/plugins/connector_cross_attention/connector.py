from torch import nn

from vlcap.api import Connector, add_cross_attention, select_layers
from vlcap.plugins.connector_cross_attention.config import CrossAttentionConfig


class CrossAttentionConnector(Connector):
    name = "cross-attention"
    description = "Image tokens read by cross-attention blocks added to the decoder layers (the course's design)"
    config_class = CrossAttentionConfig

    def apply(self, captioner, config):
        decoder = captioner.decoder
        width = decoder.cfg.n_embd
        # One image token per encoder token, in the decoder's width (checkpoint key "projection").
        captioner.projection = nn.Linear(captioner.encoder.embed_dim, width)
        for i in select_layers(config.layers, decoder.cfg.n_layer, section="connector.options"):
            add_cross_attention(decoder.h[i], decoder.cfg)
