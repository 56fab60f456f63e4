"""How a site's update is protected on its way to the aggregator.

A scheme has three steps: the site ``protect``s its weighted update, the
aggregator ``combine``s payloads without reading any one of them, the sites
``reveal`` the aggregate. Only `plain` exists so far: the baseline with no
protection, whose threat model is that the aggregator reads every update.
"""

from fedcare.protection.plain import PlainSum

__all__ = ["PlainSum"]
