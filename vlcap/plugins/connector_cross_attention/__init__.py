"""The course's 2023 design: image tokens projected to the decoder width, read by cross-attention
blocks added to the decoder's layers."""
import vlcap
from vlcap.plugins.connector_cross_attention.connector import CrossAttentionConnector


@vlcap.hookimpl
def register_connectors(register):
    register(CrossAttentionConnector())
