// A real OpenID provider for cocalcproxy's tests: panva's oidc-provider (pinned in package.json)
// on loopback HTTP, with one confidential client and the accounts given in a JSON file.
//
//   node provider.js CONFIG.json
//
// CONFIG: {"port": 0, "client": {client_id, client_secret, redirect_uris,
//          post_logout_redirect_uris}, "accounts": {"<login>": {claims...}}, "jwks": {"keys": [...]}}
// Prints one JSON line {"issuer": "http://127.0.0.1:PORT"} once it listens. Signing in uses the
// provider's development login form: any password, the login names an account of CONFIG
// (its "sub" is the login). Restarting with other "jwks" on the same "port" rotates the keys.
import fs from 'node:fs';
import http from 'node:http';

import Provider from 'oidc-provider';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const server = http.createServer();

server.listen(config.port || 0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: [{
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      ...config.client,
    }],
    jwks: config.jwks,
    async findAccount(ctx, id) {
      const claims = config.accounts[id];
      if (!claims) return undefined;
      return { accountId: id, async claims() { return { sub: id, ...claims }; } };
    },
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    // Put the scopes' claims into the ID token, as most providers do.
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: true },
      rpInitiatedLogout: { enabled: true },
    },
    pkce: { required: () => true },
    ttl: { IdToken: 300, AccessToken: 300, AuthorizationCode: 60 },
  });
  // Development login over plain HTTP on loopback: no Secure cookies are possible there.
  provider.proxy = false;
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

process.on('SIGTERM', () => server.close(() => process.exit(0)));
