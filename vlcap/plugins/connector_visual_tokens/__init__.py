"""ClipCap / LLaVA: image tokens projected to the decoder width and placed before the text in the
decoder's input sequence, read by the frozen decoder's own self-attention."""
import vlcap
from vlcap.plugins.connector_visual_tokens.connector import VisualTokensConnector


@vlcap.hookimpl
def register_connectors(register):
    register(VisualTokensConnector())
