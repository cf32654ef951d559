// A real OAuth 2.0 authorization server for the tests: panva's oidc-provider (OpenID certified),
// issuing JWT access tokens by the client credentials grant (RFC 6749 4.4) for one resource
// server (RFC 8707 resource indicators: the audience). Started by tests/authserver.py:
//   node server.mjs <settings.json>
// settings: {audience, scope, roles_claim, roles, clients: [{client_id, client_secret}]}.
// It listens on a free port of 127.0.0.1 and says which in a JSON line {"event": "listening",
// "issuer": ...}; each token issued is logged as {"event": "token_issued", "client_id": ...}.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider, { errors } from 'oidc-provider';

const settings = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const server = createServer();
await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: settings.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: settings.scope,
    token_endpoint_auth_method: 'client_secret_basic',
  })),
  scopes: [settings.scope],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => settings.audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        if (resource !== settings.audience) throw new errors.InvalidTarget();
        return {
          scope: settings.scope,
          audience: settings.audience,
          accessTokenTTL: settings.ttl_s ?? 3600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: () => ({ [settings.roles_claim]: settings.roles }),
});

provider.on('grant.success', (ctx) => {
  console.log(JSON.stringify({ event: 'token_issued', client_id: ctx.oidc.client?.clientId }));
});
provider.on('grant.error', (ctx, err) => {
  console.log(JSON.stringify({ event: 'grant_refused', error: err.error, client_id: ctx.oidc.client?.clientId }));
});

server.on('request', provider.callback());
console.log(JSON.stringify({ event: 'listening', issuer }));
