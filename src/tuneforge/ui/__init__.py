"""``tuneforge ui``: a local web app over run directories — runs, live curves, a new-run form generated from the
config schema, chat, compare / blind A/B, merge / export, search studies (docs/ui.md).

The UI is a client of the other packages: it reads run directories, starts ``tuneforge`` commands as detached
jobs and chats through ``tuneforge serve``; nothing imports it. ``import tuneforge.ui`` loads neither fastapi nor
torch: :func:`tuneforge.ui.app.create_app` imports them.
"""
