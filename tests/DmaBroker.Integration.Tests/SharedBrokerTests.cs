using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// The broker as an operator starts it for many users (SPEC §12, §13): refusals at start with one
/// line and exit code 2, and dmactl speaking to it over a Unix socket with a bearer token.
/// </summary>
public sealed class SharedBrokerTests : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private readonly string _directory = Directory.CreateTempSubdirectory("dmabroker-shared-").FullName;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    [Theory]
    [InlineData("refusing open mode", "--listen", "http://0.0.0.0:0")]
    [InlineData("needs --tls-cert", "--listen", "https://127.0.0.1:0")]
    [InlineData("unix:///absolute/path", "--listen", "unix://relative.sock")]
    [InlineData("cannot read auth file", "--listen", "http://127.0.0.1:0", "--auth-file", "/nonexistent/auth.json")]
    [InlineData("unknown option '--bogus'", "--bogus")]
    [InlineData("unknown option 'extra'", "--listen", "http://127.0.0.1:0", "extra")]
    [InlineData("option --lease-ttl-ms needs a value", "--lease-ttl-ms")]
    [InlineData("option --lease-ttl-ms needs a value", "--lease-ttl-ms", "--listen", "http://127.0.0.1:0")]
    [InlineData("--lease-ttl-ms takes a whole number, got 'abc'", "--lease-ttl-ms", "abc")]
    [InlineData("--lease-ttl-ms must be between", "--lease-ttl-ms", "5")]
    [InlineData("--http-listen takes an address", "--listen", "http://127.0.0.1:0", "--http-listen", "9464")]
    [InlineData("refusing open mode on http://0.0.0.0:0", "--listen", "http://127.0.0.1:0", "--http-listen", "http://0.0.0.0:0")]
    public async Task Start_UnsafeOrBadSetup_ExitsTwoWithOneLine(string expected, params string[] args)
    {
        await using var broker = ClientProcess.Start(LiveBroker.AssemblyPath, args);
        Assert.Equal(2, await broker.WaitForExitAsync(Timeout));
        var lines = broker.Transcript.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        var line = Assert.Single(lines);
        Assert.StartsWith("stderr: dmabroker: ", line, StringComparison.Ordinal);
        Assert.Contains(expected, line, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Start_PortInUse_ExitsTwoWithOneLine()
    {
        using var taken = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        taken.Start();
        var port = ((System.Net.IPEndPoint)taken.LocalEndpoint).Port;
        await using var broker = ClientProcess.Start(LiveBroker.AssemblyPath, "--listen", $"http://127.0.0.1:{port}", "--http-listen", "none");
        Assert.Equal(2, await broker.WaitForExitAsync(Timeout));
        var line = Assert.Single(broker.Transcript.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.Equal($"stderr: dmabroker: --listen http://127.0.0.1:{port}: address already in use (see --help)", line);
    }

    [Fact]
    public async Task Start_HttpListenPortInUse_ExitsTwoWithOneLine()
    {
        using var taken = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        taken.Start();
        var port = ((System.Net.IPEndPoint)taken.LocalEndpoint).Port;
        await using var broker = ClientProcess.Start(LiveBroker.AssemblyPath, "--listen", "http://127.0.0.1:0", "--http-listen", $"http://127.0.0.1:{port}");
        Assert.Equal(2, await broker.WaitForExitAsync(Timeout));
        var line = Assert.Single(broker.Transcript.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.Equal($"stderr: dmabroker: --http-listen http://127.0.0.1:{port}: address already in use (see --help)", line);
    }

    [Fact]
    public async Task Start_Default_PrintsOneBannerAndNoRequestLogs()
    {
        await using var broker = ClientProcess.Start(LiveBroker.AssemblyPath, "--listen", "http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0");
        var banner = await broker.WaitForLineAsync("DmaBroker ", Timeout);
        Assert.Contains("serving http://127.0.0.1:", banner, StringComparison.Ordinal);
        Assert.Contains("auth: open mode", banner, StringComparison.Ordinal);
        Assert.Contains("23 devices, 18 groups", banner, StringComparison.Ordinal);
        var address = banner[(banner.IndexOf("serving ", StringComparison.Ordinal) + "serving ".Length)..banner.IndexOf(';', StringComparison.Ordinal)];
        await using (var groups = ClientProcess.Start("dmactl.dll", "--broker", address, "groups"))
            Assert.Equal(0, await groups.WaitForExitAsync(Timeout));
        broker.Interrupt();
        Assert.Equal(0, await broker.WaitForExitAsync(Timeout));
        Assert.DoesNotContain("Request starting", broker.Transcript, StringComparison.Ordinal);
        Assert.DoesNotContain("Executing endpoint", broker.Transcript, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Dmactl_OverUnixSocketWithToken_HoldsAGroupAndListsSessionsByPrincipal()
    {
        const string Token = "ci-runner-secret";
        var hash = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(Token)));
        var auth = Path.Combine(_directory, "auth.json");
        await File.WriteAllTextAsync(auth, $$"""
            { "principals": [
                { "name": "token:ci-runner", "token_sha256": "{{hash}}", "roles": ["user"] },
                { "name": "uid:*", "roles": ["viewer"] } ] }
            """);
        var socket = Path.Combine(_directory, "broker.sock");
        await using var broker = ClientProcess.Start(LiveBroker.AssemblyPath, "--listen", $"unix://{socket}", "--http-listen", "none", "--auth-file", auth,
            "--Logging:LogLevel:Default=Warning", "--Logging:LogLevel:Microsoft.Hosting.Lifetime=Information");
        await broker.WaitForLineAsync("Now listening on: http://unix:", Timeout);
        var address = $"unix://{socket}";

        // As the socket's uid (a viewer): reading works, claiming does not.
        await using (var groups = ClientProcess.Start("dmactl.dll", "--broker", address, "groups"))
        {
            Assert.Equal(0, await groups.WaitForExitAsync(Timeout));
            Assert.Contains("GROUP", groups.Transcript, StringComparison.Ordinal);
        }
        await using (var denied = ClientProcess.Start("dmactl.dll", "--broker", address, "hold", "14"))
        {
            Assert.Equal(1, await denied.WaitForExitAsync(Timeout));
            Assert.Contains("EACCES", denied.Transcript, StringComparison.Ordinal);
        }

        // With the token: a user holding group 14, seen by principal in `dmactl sessions`.
        await using var hold = ClientProcess.Start("dmactl.dll", "--broker", address, "--token", Token, "hold", "14");
        await hold.WaitForLineAsync("holding group 14", Timeout);
        await using (var sessions = ClientProcess.Start("dmactl.dll", "--broker", address, "--json", "sessions"))
        {
            Assert.Equal(0, await sessions.WaitForExitAsync(Timeout));
            using var json = JsonDocument.Parse(sessions.Transcript);
            var session = Assert.Single(json.RootElement.GetProperty("sessions").EnumerateArray());
            Assert.Equal("token:ci-runner", session.GetProperty("principal").GetString());
            Assert.Equal("dmactl hold", session.GetProperty("clientName").GetString());
            Assert.Equal([14u], session.GetProperty("groups").EnumerateArray().Select(g => g.GetUInt32()));
        }
        hold.Interrupt();
        Assert.Equal(0, await hold.WaitForExitAsync(Timeout));
    }
}
