"""Outputs beside the ZeroMQ results: MQTT and OPC UA (docs/service.md, "Outputs: MQTT and OPC UA").

Each output is one module behind the small interface in base.py, fed by the fan-out (fanout.py) that the
pipeline's publish stage calls instead of the ZeroMQ publisher alone. The modules that need an optional
library (paho-mqtt, asyncua) are imported only when their section is in the config.
"""
