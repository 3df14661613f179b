using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using DmaBroker.Core;
using DmaBroker.Core.Access;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.AspNetCore.Connections.Features;

namespace DmaBroker.Server.Hosting;

/// <summary>Who made a gRPC call and what they may do; set by <see cref="AccessGate"/> before the call runs.</summary>
public sealed record Caller(Grant Grant)
{
    /// <summary>The principal: <c>cert:&lt;CN&gt;</c>, <c>token:&lt;name&gt;</c>, <c>uid:&lt;n&gt;</c> or <c>anonymous</c>.</summary>
    public string Principal => Grant.Principal;
}

/// <summary>
/// Authentication and role checks for every gRPC call, before the request is even read (SPEC
/// §12). The principal is the most specific credential the call carries: a bearer token, else the
/// TLS client certificate, else the Unix socket peer's uid, else <c>anonymous</c>. On a TLS
/// listener that requires client certificates (<c>--client-ca</c>), a call without a valid one is
/// refused whatever else it carries. Refusals are written as gRPC trailers-only responses with
/// the same ErrorInfo every other error carries. A refused call that the audit log records (a
/// claim, a release, an admin action) is audited here, since it never reaches <see cref="AuditInterceptor"/>.
/// </summary>
public sealed class AccessGate(AccessControl access, ClientCertificateTrust? clientTrust, BrokerAudit? audit = null)
{
    private const string BearerPrefix = "Bearer ";
    private const string BasicPrefix = "Basic ";

    /// <summary>The middleware: resolves the caller, checks its role for the method, or refuses.</summary>
    public Task InvokeAsync(HttpContext http, RequestDelegate next)
    {
        if (!IsGrpc(http.Request))
            return next(http);
        Grant? grant = null;
        try
        {
            grant = Authenticate(http);
            if (CallRoles.For(http.Request.Path) is { } needed && !grant.Permits(needed))
                throw ErrnoException.Denied($"{grant.Principal} ({Describe(grant.Role)}) may not call {ErrnoException.Quote(http.Request.Path.Value)}: it needs the {needed.ToString().ToLowerInvariant()} role");
        }
        catch (ErrnoException e)
        {
            if (audit is not null && AuditedCall.ActionOf(http.Request.Path.Value) is { } action)
                audit.Write(action, grant?.Principal ?? AuditedCall.Unauthenticated, 0, 0, 0, e.Errno.ToString(), $"{http.Request.Path.Value} refused before it ran");
            GrpcErrors.WriteTrailersOnly(http.Response, e);
            return Task.CompletedTask;
        }
        http.Features.Set(new Caller(grant));
        return next(http);
    }

    /// <summary>
    /// The caller's grant under the current policy; UNAUTHENTICATED / EACCES when it has none. With
    /// <paramref name="basic"/> (the web listener, for browsers, whose EventSource cannot send a
    /// bearer header), <c>Authorization: Basic</c> also carries a bearer token, as its password.
    /// </summary>
    public Grant Authenticate(HttpContext http, bool basic = false)
    {
        var policy = access.Current;
        var certificate = clientTrust is not null && http.Request.IsHttps
            ? clientTrust.Authenticate(http.Connection.ClientCertificate)
            : null;
        string principal;
        if (!policy.IsOpen && http.Request.Headers.Authorization.ToString() is { Length: > 0 } authorization)
        {
            var token = TokenOf(authorization, basic) ?? throw ErrnoException.Unauthenticated(basic
                ? "the authorization header must be 'Bearer <token>', or 'Basic' with the token as the password"
                : "the authorization header must be 'Bearer <token>'");
            principal = policy.AuthenticateBearer(token)
                ?? throw ErrnoException.Unauthenticated("unknown or wrong bearer token");
        }
        else if (certificate is not null)
        {
            principal = certificate;
        }
        else if (http.Features.Get<IConnectionSocketFeature>()?.Socket is { AddressFamily: AddressFamily.Unix } socket
            && PeerCredentials.Of(socket) is { } peer)
        {
            principal = $"uid:{peer.Uid}";
        }
        else
        {
            principal = AccessPolicy.Anonymous;
        }
        return policy.Resolve(principal)
            ?? throw ErrnoException.Unauthenticated($"{ErrnoException.Quote(principal)} is not a principal of the auth file");
    }

    // 'Bearer <token>'; with basic, also 'Basic base64(<any user>:<token>)'. Null for anything else.
    private static string? TokenOf(string authorization, bool basic)
    {
        if (authorization.StartsWith(BearerPrefix, StringComparison.OrdinalIgnoreCase))
            return authorization[BearerPrefix.Length..].Trim();
        if (!basic || !authorization.StartsWith(BasicPrefix, StringComparison.OrdinalIgnoreCase))
            return null;
        var encoded = authorization.AsSpan(BasicPrefix.Length).Trim();
        var bytes = new byte[encoded.Length];
        if (!Convert.TryFromBase64Chars(encoded, bytes, out var length))
            return null;
        var credentials = Encoding.UTF8.GetString(bytes, 0, length);
        System.Security.Cryptography.CryptographicOperations.ZeroMemory(bytes);
        var colon = credentials.IndexOf(':', StringComparison.Ordinal);
        return colon < 0 ? null : credentials[(colon + 1)..];
    }

    private static bool IsGrpc(HttpRequest request) =>
        request.ContentType is { } type && type.StartsWith("application/grpc", StringComparison.OrdinalIgnoreCase);

    private static string Describe(Role? role) => role?.ToString().ToLowerInvariant() ?? "no role";
}

/// <summary>Which role each gRPC method needs (SPEC §12's roles table); null for a method the broker does not serve.</summary>
public static class CallRoles
{
    /// <summary>The role a call to <paramref name="path"/> (<c>/package.Service/Method</c>) needs.</summary>
    public static Role? For(PathString path)
    {
        var value = path.Value.AsSpan();
        if (value.Length < 2 || value[0] != '/')
            return null;
        value = value[1..];
        var slash = value.IndexOf('/');
        if (slash <= 0)
            return null;
        var service = value[..slash];
        var method = value[(slash + 1)..];
        return service switch
        {
            "dmabroker.v1.Topology" => Role.Viewer,
            // Kernel.* is the admin's, but for counts, sessions and faults (viewers) and revoking one's own session (users).
            "dmabroker.v1.Kernel" => method switch
            {
                "GetStats" or "ListSessions" or "ListFaults" => Role.Viewer,
                "RevokeSession" => Role.User,
                _ => Role.Admin,
            },
            "dmabroker.v1.Session" or "dmabroker.v1.Vfio" or "dmabroker.v1.Memory" or "dmabroker.v1.Dma" => Role.User,
            "grpc.health.v1.Health" or "grpc.reflection.v1alpha.ServerReflection" or "grpc.reflection.v1.ServerReflection" => Role.Viewer,
            _ => null,
        };
    }
}

/// <summary>
/// Validates TLS client certificates against the configured CA bundle (<c>--client-ca</c>) and
/// names the principal <c>cert:&lt;CN&gt;</c>. The TLS handshake accepts any certificate so that a
/// bad one is refused as a gRPC UNAUTHENTICATED / EACCES with a reason, not as a torn connection.
/// A connection's certificate is checked once.
/// </summary>
public sealed class ClientCertificateTrust(X509Certificate2Collection authorities)
{
    private readonly ConditionalWeakTable<X509Certificate2, string> _verdicts = [];

    /// <summary>Reads a PEM bundle of CA certificates.</summary>
    public static ClientCertificateTrust Load(string pemPath)
    {
        var authorities = new X509Certificate2Collection();
        authorities.ImportFromPemFile(pemPath);
        if (authorities.Count == 0)
            throw new ArgumentException($"--client-ca {pemPath} holds no PEM certificate");
        return new ClientCertificateTrust(authorities);
    }

    /// <summary>The principal <c>cert:&lt;CN&gt;</c> of a valid certificate; UNAUTHENTICATED / EACCES otherwise.</summary>
    public string Authenticate(X509Certificate2? certificate)
    {
        if (certificate is null)
            throw ErrnoException.Unauthenticated("this listener requires a client certificate (mTLS)");
        var verdict = _verdicts.GetValue(certificate, Verify);
        return verdict.StartsWith("cert:", StringComparison.Ordinal)
            ? verdict
            : throw ErrnoException.Unauthenticated($"bad client certificate: {verdict}");
    }

    private string Verify(X509Certificate2 certificate)
    {
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(authorities);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        chain.ChainPolicy.ApplicationPolicy.Add(new System.Security.Cryptography.Oid("1.3.6.1.5.5.7.3.2")); // clientAuth
        if (!chain.Build(certificate))
        {
            var reasons = string.Join("; ", chain.ChainStatus.Select(s => s.StatusInformation.Trim()).Where(s => s.Length > 0).Distinct());
            return reasons.Length > 0 ? reasons : "not issued by the configured client CA";
        }
        var cn = certificate.GetNameInfo(X509NameType.SimpleName, forIssuer: false);
        return string.IsNullOrEmpty(cn) ? "the certificate has no subject CN" : $"cert:{cn}";
    }
}

/// <summary>gRPC errors written outside a service: the status, its message and the ErrorInfo detail.</summary>
public static class GrpcErrors
{
    /// <summary>The google.rpc.Status of a core error: the code of its kind, the message, ErrorInfo{reason = errno}.</summary>
    public static Google.Rpc.Status ToStatus(ErrnoException e) => ErrorInterceptor.ToRpcException(e).GetRpcStatus()!;

    /// <summary>Answers a gRPC request with only headers carrying the error (a trailers-only response).</summary>
    public static void WriteTrailersOnly(HttpResponse response, ErrnoException e)
    {
        var status = ToStatus(e);
        response.StatusCode = StatusCodes.Status200OK;
        response.ContentType = "application/grpc";
        response.Headers["grpc-status"] = status.Code.ToString(System.Globalization.CultureInfo.InvariantCulture);
        response.Headers["grpc-message"] = PercentEncode(status.Message);
        response.Headers["grpc-status-details-bin"] = Convert.ToBase64String(status.ToByteArray());
    }

    /// <summary>grpc-message's encoding: printable ASCII as is, everything else (and '%') as %XX of its UTF-8 bytes.</summary>
    public static string PercentEncode(string message)
    {
        var bytes = Encoding.UTF8.GetBytes(message);
        var text = new StringBuilder(bytes.Length);
        foreach (var b in bytes)
        {
            if (b is >= 0x20 and <= 0x7e and not (byte)'%')
                text.Append((char)b);
            else
                text.Append('%').Append(b.ToString("X2", System.Globalization.CultureInfo.InvariantCulture));
        }
        return text.ToString();
    }
}
