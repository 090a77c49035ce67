"""The download stage: sources in, verified local files out (asyncio + aiohttp)."""
